"""Stand-in for the `ldm` / `sgm` packages the webui pins: tiny real models with ldm-shaped attributes."""
