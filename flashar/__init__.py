"""flashar: make pretrained autoregressive image generators fast.

FlashAR (arXiv 2605.09430) adds a vertical branch and a fusion gate to a raster-scan AR image model and
decodes the token grid along anti-diagonals in H + W - 1 forward passes instead of H * W. flashar does this
for any backbone a plugin describes, and compares it with the raster baseline and peer methods.
"""

__version__ = "0.1.0"
