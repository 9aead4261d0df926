"""Where the checkpoint stage's model comes from: the built-in model trained here, random weights in
the published shapes, or an imported checkpoint."""
