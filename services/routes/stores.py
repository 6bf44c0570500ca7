"""``/v1/stores``: the label stores under the store root, read through the store's own API."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path

from stillroom.services.deps import NOT_FOUND, UNAUTHORIZED, Auth, ServiceDep

router = APIRouter(prefix="/v1/stores", tags=["stores"], responses=UNAUTHORIZED)


@router.get("", summary="Every store: its key, complete seeds, samples, data set, recipe, teachers, size")
def list_all(service: ServiceDep, _: Auth) -> list[dict[str, Any]]:
    from stillroom.pipelines.store import list_stores

    return [{"cache_key": s.cache_key, "seeds": s.seeds(), "samples": s.schema.num_samples,
             "dataset": s.provenance.get("dataset", {}).get("spec"),
             "recipe": s.provenance.get("recipe", {}).get("name"),
             "teachers": [t.get("name") for t in s.provenance.get("teachers", [])],
             "size_on_disk": s.size_on_disk()} for s in list_stores(service.settings.store_root)]


@router.get("/{cache_key}", responses=NOT_FOUND, summary="One store, as `stillroom store inspect` shows it")
def show(cache_key: Annotated[str, Path(pattern=r"^[0-9a-f]{8,64}$")], service: ServiceDep,
         _: Auth) -> dict[str, Any]:
    from stillroom.pipelines.store import LabelStore, StoreError

    try:
        return LabelStore(service.settings.store_of(cache_key)).describe()
    except StoreError:
        raise HTTPException(404, f"no store {cache_key}") from None
