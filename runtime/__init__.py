"""Runs compiled intervention plans on live PyTorch models."""
