"""edge-agent: an open replacement for the Amazon Lookout for Vision Edge Agent."""

__version__ = "0.1.0"
