"""The flow as a file path, for Prefect deployments that want one (`flows/steer_heal.py:steer_heal`).

The flow itself lives in the package: src/steer_heal/flow.py.
"""

from steer_heal.flow import steer_heal

__all__ = ["steer_heal"]
