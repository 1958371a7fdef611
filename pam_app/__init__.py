"""The top layer: the ``pam`` command and the demo. Both import every layer (merging, mobile_export,
service), so they live above them; no layer imports this package."""
