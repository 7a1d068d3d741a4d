"""Pure, deterministic policies (time passed in), shared by the services and the simulator."""
