"""Models: the relevance judge (prompts, label-token scoring, LoRA), the ranker (LightGBM), encoders and
losses. Plain PyTorch / scikit-style code with no Ray imports, so it unit-tests in milliseconds."""
