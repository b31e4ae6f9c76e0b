"""The transport-neutral core: model packages, lifecycle, admission, frames, pipeline, inference, discovery.

Imports nothing of grpc, prometheus_client, awsiot, boto3 or yaml (tests/test_layout.py checks).
"""
