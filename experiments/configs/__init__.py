"""ml_collections configs (`get_config(arg)`); `sab_jax.config_utils.load_config("demo:smoke")` loads one."""
