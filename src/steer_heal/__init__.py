"""steer-heal: steer -> generate -> filter -> heal-with-barrier -> bake, for N rounds."""

__version__ = "0.1.0"
