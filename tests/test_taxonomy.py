"""The taxonomy: built from folders and files, checked, and its derived views."""

from __future__ import annotations

import json

import numpy as np
import pytest
from taxonedge.edge.kernel.taxonomy import Taxonomy, TaxonomyError, slugify

from .conftest import TINY_LABELS, write_image_tree


def test_from_folder_uneven_depth(tmp_path):
    write_image_tree(tmp_path, TINY_LABELS, per_class=2)
    tax = Taxonomy.from_folder(tmp_path)
    assert tax.leaf_labels == sorted(TINY_LABELS)
    assert tax.depth == 3
    avocado = tax.by_label["Fruit/Avocado"]
    assert avocado.is_leaf and avocado.depth == 2
    # a leaf shallower than a depth counts as itself there
    assert avocado in tax.level_nodes(3)
    assert [n.label for n in tax.level_nodes(1)] == ["Fruit", "Vegetables"]


def test_level_matrices_sum_children(tmp_path):
    tax = Taxonomy.from_paths(TINY_LABELS)
    probs = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)  # leaf order is sorted label order
    by_leaf = dict(zip(tax.leaf_labels, probs, strict=True))
    level2 = probs @ tax.level_matrix(2)
    names = [n.label for n in tax.level_nodes(2)]
    apple = by_leaf["Fruit/Apple/Granny-Smith"] + by_leaf["Fruit/Apple/Pink-Lady"]
    assert level2[names.index("Fruit/Apple")] == pytest.approx(apple)
    assert (probs @ tax.level_matrix(1)).sum() == pytest.approx(1.0)
    for depth in (1, 2, 3):
        assert tax.level_matrix(depth).sum(axis=1).tolist() == [1.0] * tax.num_leaves
        nodes = tax.level_nodes(depth)
        for i, leaf in enumerate(tax.leaves):
            assert nodes[tax.level_index(depth)[i]] is tax.ancestor(leaf, depth)


def test_leaf_folder_without_images_is_an_error(tmp_path):
    write_image_tree(tmp_path, ["Fruit/Apple"], per_class=1)
    (tmp_path / "Fruit" / "Banana").mkdir()
    with pytest.raises(TaxonomyError, match="Fruit/Banana.*without images|without images.*Fruit/Banana"):
        Taxonomy.from_folder(tmp_path)


def test_leaf_with_children_is_an_error():
    with pytest.raises(TaxonomyError, match="'Fruit/Apple' is a leaf"):
        Taxonomy.from_paths(["Fruit/Apple", "Fruit/Apple/Granny-Smith"])


def test_duplicate_siblings_and_slug_collisions(tmp_path):
    data = {"nodes": [{"name": "Fruit", "children": ["Apple", "Apple"]}]}
    with pytest.raises(TaxonomyError, match="duplicate sibling 'Apple'"):
        Taxonomy.from_dict(data)
    with pytest.raises(TaxonomyError, match="same slug 'red-apple'"):
        Taxonomy.from_dict({"nodes": [{"name": "F", "children": ["Red Apple", "red-apple"]}]})


def test_mqtt_unsafe_names_get_safe_slugs():
    tax = Taxonomy.from_paths(["Drinks/Juice+Soda", "Drinks/Milk #1", "Frukt/Äpple"])
    slugs = {n.label: n.slug for n in tax.nodes()}
    assert slugs["Drinks/Juice+Soda"] == "juice-soda"
    assert slugs["Drinks/Milk #1"] == "milk-1"
    assert slugs["Frukt/Äpple"] == "apple"
    with pytest.raises(TaxonomyError, match="unsafe in an MQTT topic"):
        Taxonomy.from_dict({"nodes": [{"name": "A", "slug": "a/b"}]})
    with pytest.raises(TaxonomyError, match="no usable slug"):
        Taxonomy.from_paths(["Fruit/???"])


def test_file_roundtrip_yaml_and_json(tmp_path):
    yaml_text = """
name: shop
nodes:
  - name: Fruit
    id: F1
    children:
      - name: Apple
        display: Apples
        children: [Granny-Smith, Pink-Lady]
      - Avocado
  - name: Vegetables
    children: [Carrot]
"""
    (tmp_path / "t.yaml").write_text(yaml_text)
    tax = Taxonomy.from_file(tmp_path / "t.yaml")
    assert tax.leaf_labels == [
        "Fruit/Apple/Granny-Smith",
        "Fruit/Apple/Pink-Lady",
        "Fruit/Avocado",
        "Vegetables/Carrot",
    ]
    assert tax.by_label["Fruit"].id == "F1"
    assert tax.by_label["Fruit/Apple"].display == "Apples"
    (tmp_path / "t.json").write_text(json.dumps(tax.to_dict()))
    again = Taxonomy.from_file(tmp_path / "t.json")
    assert again == tax and again.hash == tax.hash
    (tmp_path / "bad.yaml").write_text("nodes:\n  - name: A\n    colour: red\n")
    with pytest.raises(TaxonomyError, match=r"bad.yaml: node 'A': unknown keys \['colour'\]"):
        Taxonomy.from_file(tmp_path / "bad.yaml")


def test_hash_changes_with_content():
    a = Taxonomy.from_paths(TINY_LABELS)
    b = Taxonomy.from_paths(TINY_LABELS + ["Vegetables/Leek"])
    c = Taxonomy.from_paths(list(reversed(TINY_LABELS)))
    assert a.hash != b.hash
    assert a.hash == c.hash  # order of discovery does not matter: the tree is sorted
    assert a.hash.startswith("sha256:")


def test_slugify():
    assert slugify("Granny Smith") == "granny-smith"
    assert slugify("Oatly  Natural_Oatghurt") == "oatly-natural_oatghurt"
