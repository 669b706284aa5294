"""Analysis without a GPU: SASS counts and resources for sm_90, compile checks, host time per call."""
