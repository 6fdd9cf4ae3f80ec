"""Test setup: 8 fake CPU devices so sharded code runs on any machine."""
import jax

jax.config.update("jax_num_cpu_devices", 8)
