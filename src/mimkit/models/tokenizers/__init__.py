"""Visual tokenizers for CIM: images in [0, 1] -> a grid of discrete tokens -> images again."""
