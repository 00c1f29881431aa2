"""Attention over a KV cache: ``api.attention`` dispatches to the CPU FFI kernel or the XLA path."""
