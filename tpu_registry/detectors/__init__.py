"""Built-in detectors. Each module is an ordinary plugin implementing ``tpu_registry_detect``."""
