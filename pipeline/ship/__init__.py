"""Ship a finished bundle into a mobile app: Android (Gradle) assets or iOS (Xcode) resources.

`detect` finds the app kind and a safe destination, `embed` writes the metadata into the .tflite, `copy`
stages, verifies and swaps the folder, `version` refuses downgrades; `api.ship` ties them together.
"""

from pipeline.ship.api import ShipResult, default_model_name, ship, ship_target

__all__ = ["ShipResult", "default_model_name", "ship", "ship_target"]
