"""Call the API server as in-cluster config does, print what came back, exit with $EXIT_CODE.

Prints one JSON line, so the test reads the result from the pod's log.
"""

import json
import os
import ssl
import sys
import urllib.error
import urllib.request

SA = "/var/run/secrets/kubernetes.io/serviceaccount"


def main() -> int:
    host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
    namespace, name = os.environ["POD_NAMESPACE"], os.environ["POD_NAME"]
    url = f"https://{host}:{port}/api/v1/namespaces/{namespace}/pods/{name}"
    result: dict[str, object] = {"url": url, "uid": os.getuid()}
    try:
        with open(f"{SA}/token") as f:
            token = f.read()
        ctx = ssl.create_default_context(cafile=f"{SA}/ca.crt")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, context=ctx, timeout=15) as resp:
            body = json.load(resp)
        result.update(status=resp.status, pod=body["metadata"]["name"], node=body["spec"].get("nodeName"))
    except urllib.error.HTTPError as err:
        result.update(status=err.code, error=str(err))
    except Exception as err:  # the test prints whatever went wrong
        result.update(status=None, error=f"{type(err).__name__}: {err}")
    try:
        open("/probe-write-test", "w").close()
        result["rootfs_writable"] = True
    except OSError:
        result["rootfs_writable"] = False
    print(json.dumps(result), flush=True)
    return int(os.environ.get("EXIT_CODE", "0"))


if __name__ == "__main__":
    sys.exit(main())
