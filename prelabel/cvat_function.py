"""`cvat-cli task auto-annotate TASK --function-module prelabel.cvat_function -p ...`.

A thin re-export: the function lives in `connectors.cvat.function` (it is CVAT integration).
"""

from connectors.cvat.function import PrelabelFunction, create

__all__ = ["PrelabelFunction", "create"]
