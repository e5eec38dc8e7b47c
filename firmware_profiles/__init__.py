"""firmware_profiles package."""
