"""Loss functions as pure functions over tensors."""
