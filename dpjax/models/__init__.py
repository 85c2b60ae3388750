"""Flax models (encoder, decoder, adapters, generation) and their Hugging Face / GGUF loaders.

They depend on nothing private: the private core sees only a pure loss.
"""
