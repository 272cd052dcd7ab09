"""The Open Inference Protocol (v2) stubs the `oip` model backend calls."""
