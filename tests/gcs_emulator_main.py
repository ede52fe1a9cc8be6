"""`python gcs_emulator_main.py start --host ... --port ...`: gcp-storage-emulator, with the one
response header real GCS sends on every download and TensorStore needs: `x-goog-generation` (the
emulator omits it; TensorStore's OCDBT reads it to make its conditional manifest writes, and
fails with "Malformed StorageGeneration" without it). Used by tests/gcs_helpers.py only."""
import functools
import sys

from gcp_storage_emulator.handlers import objects


def _with_generation(download):
    @functools.wraps(download)
    def wrapped(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        except Exception:   # not found: the handler already answered 404
            return
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))
    return wrapped


objects.download = _with_generation(objects.download)

from gcp_storage_emulator.__main__ import main  # noqa: E402  (after the patch: routes bind at import)

if __name__ == "__main__":
    sys.exit(main())
