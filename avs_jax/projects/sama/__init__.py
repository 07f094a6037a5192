"""SAMA-AVS: SAM with audio prompts (docs/SAMA.md)."""
