"""Optional integrations, each behind its extra and importing only its own framework:
``flask`` (:mod:`.flask`, :mod:`.flask_console`), ``fastapi`` (:mod:`.fastapi`,
:mod:`.fastapi_console`), ``redis`` (:mod:`.redis_slots`, per-business call slots) and
``sqlalchemy`` (:mod:`.sqlalchemy`). The web adapters translate requests for the
framework-free web core (:mod:`outbound_heartbeat.web`) and console
(:mod:`outbound_heartbeat.console`)."""
