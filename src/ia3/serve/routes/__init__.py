"""The APIs of `ia3 serve`, one module-level `APIRouter` each: `native` (`/v1/generate`, `/v1/classify`), `openai`
(`/v1/models`, `/v1/completions`, `/v1/chat/completions`), `admin` (`/v1/adapters`, `/health`) and `metrics`
(`/metrics`). `ia3.serve.app.create_app` includes them; each route reaches the `Service` through the
`get_service` dependency and calls its public methods only.

Routes tagged `inference` are the ones whose answered requests' latency the metrics record.
"""

INFERENCE = "inference"
