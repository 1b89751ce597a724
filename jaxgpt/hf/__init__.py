"""Hugging Face interoperability: safetensors I/O, import, export, weight mapping, torch peer."""
