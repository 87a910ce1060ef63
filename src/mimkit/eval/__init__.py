"""Evaluation of pretrained encoders: k-NN, linear probe, fine-tuning."""
