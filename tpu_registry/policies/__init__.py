"""Built-in tuning policies. Each module is an ordinary plugin implementing ``tpu_registry_tune``."""
