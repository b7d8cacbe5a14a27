"""Command lines: `mor-pretrain`, `mor-export`, ... (console scripts) and `python jobs/<name>.py` run these."""
