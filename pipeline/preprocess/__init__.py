"""The offline preprocessing job: inspect, check and transcode a collection into a manifest or shards."""
