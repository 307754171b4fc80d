"""The frozen-language-model family: an image tower, a connector and a causal LM (`base.FrozenLMMethod`)."""
