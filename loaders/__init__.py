"""torch / safetensors loaders -- built in a later issue."""
