"""Starting from open models: read a Hugging Face Llama (folder, GGUF file, hub name), map its weights into
megatron-core's layout, and fill a vanilla, recursive or MoR model's slots from its layers."""
