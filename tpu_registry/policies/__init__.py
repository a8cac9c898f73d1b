"""Built-in tuning policies: each module is an ordinary plugin implementing the tune hook."""
