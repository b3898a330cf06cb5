"""The inference engine: requests, scheduler, KV page pool, model runner, sampling."""
