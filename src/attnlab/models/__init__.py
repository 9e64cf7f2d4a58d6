from .forecast import ForecastConfig, ForecastTransformer, build_forecast_model
from .lm import LM, LMConfig

__all__ = ["ForecastConfig", "ForecastTransformer", "LM", "LMConfig", "build_forecast_model"]
