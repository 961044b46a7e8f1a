//! Class names. A weights file can carry its own (`labels` metadata); a 47-class model without
//! them is taken to be an iMaterialist Fashion 2019 model.

/// The 46 iMaterialist Fashion 2019 categories in the order of the competition's
/// `label_descriptions.json` (the same as Fashionpedia's): torchvision label `k` is
/// iMaterialist ClassId `k - 1`. 0–26 are garments and accessories, 27–45 garment parts.
pub const IMATERIALIST_2019: [&str; 46] = [
    "shirt, blouse",
    "top, t-shirt, sweatshirt",
    "sweater",
    "cardigan",
    "jacket",
    "vest",
    "pants",
    "shorts",
    "skirt",
    "coat",
    "dress",
    "jumpsuit",
    "cape",
    "glasses",
    "hat",
    "headband, head covering, hair accessory",
    "tie",
    "glove",
    "watch",
    "belt",
    "leg warmer",
    "tights, stockings",
    "sock",
    "shoe",
    "bag, wallet",
    "scarf",
    "umbrella",
    "hood",
    "collar",
    "lapel",
    "epaulette",
    "sleeve",
    "pocket",
    "neckline",
    "buckle",
    "zipper",
    "applique",
    "bead",
    "bow",
    "flower",
    "fringe",
    "ribbon",
    "rivet",
    "ruffle",
    "sequin",
    "tassel",
];

/// Names for foreground classes 1..num_classes-1 when the file carries none.
pub fn default_labels(num_classes: usize) -> Vec<String> {
    if num_classes == IMATERIALIST_2019.len() + 1 {
        IMATERIALIST_2019.iter().map(|s| s.to_string()).collect()
    } else {
        (1..num_classes).map(|k| format!("class {k}")).collect()
    }
}
