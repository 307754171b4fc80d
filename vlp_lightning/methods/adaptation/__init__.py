"""Adaptation methods: start from a pretrained suite method, train only what they add (`base.AdaptationMethod`)."""
