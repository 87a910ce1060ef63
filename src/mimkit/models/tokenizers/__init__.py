"""Visual tokenizers for CIM: images in [0, 1] -> a grid of discrete tokens -> images again.

The contract and the common config (`base`), one module per kind that registers itself (`kmeans`, `vqvae`,
`dall_e`; `registry` finds them by `tokenizer.kind`), and the tokenizer file (`files`). Fitting one to data is a
procedure above the parts: `mimkit.procedures.tokenizer_fit`.
"""
