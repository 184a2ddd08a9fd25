import os
import sys

# Tests import the packages from the checkout, installed or not.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Real S3 (moto server mode) and HTTP servers on 127.0.0.1, shared by the storage, reader, prep and train tests.
pytest_plugins = ["tests.servers"]
