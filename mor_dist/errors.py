"""The project's shared exception: a leaf module, so any module can raise it without importing the config."""


class ConfigError(ValueError):
    """A config value is missing, unknown or impossible; the message names the key and the fix."""
