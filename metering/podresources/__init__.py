"""The kubelet's pod-resources API (v1), generated from the vendored api.proto (README.md).

Import the generated modules by name: `api_pb2` (messages) and `api_pb2_grpc` (the
`PodResourcesLister` stub and servicer). Never edit them by hand: a test regenerates them
and fails when they differ. `metering.attribution` is the only client.
"""

__all__: list[str] = []
