"""Write the fleet's model list for the proxy's GET /v1/models, in OpenAI's shape.

    python deploy/fleet.py smollm2-135m-instruct gemma-3-270m-q4_k_m > /etc/nginx/gguf-models.json

Each argument is a model id as its instance serves it (a catalogue key's `id`, or for a
MODEL=path instance the file name without .gguf).
"""

import json
import sys
import time


def model_list(ids: list[str], created: int) -> dict:
    data = [{"id": i, "object": "model", "created": created, "owned_by": "local", "root": i, "parent": None,
             "permission": []} for i in ids]
    return {"object": "list", "data": data}


if __name__ == "__main__":
    json.dump(model_list(sys.argv[1:], int(time.time())), sys.stdout)
