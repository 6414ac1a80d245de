import os

from hypothesis import HealthCheck, settings

# CI runs the "ci" profile (more examples); local runs stay quick. Select with HYPOTHESIS_PROFILE.
settings.register_profile("dev", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
