"""The agency API: the gRPC service back offices call, and the interceptor that names the calling party first."""

__all__: list[str] = []
