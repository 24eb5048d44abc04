"""antidoor: backdoor purification of image classifiers that holds up under attack."""

__version__ = "0.1.0"
