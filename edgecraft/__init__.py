"""edgecraft: train tiny language models on ordinary hardware and ship them to the edge."""

__version__ = "0.1.0"
