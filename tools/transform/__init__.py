"""Gallery transforms: map stored old-model embeddings into a new model's space (forward compatibility)."""
