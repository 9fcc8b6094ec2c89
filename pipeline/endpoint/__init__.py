"""What the OpenAI-compatible endpoints answer, apart from HTTP serving: request and response
models (``protocol``), answers from an ``Engine`` (``api``), errors as OpenAI's JSON
(``errors``), per-request metering (``metrics``). Online replicas and bulk OpenAI Batch jobs
both answer through it."""
