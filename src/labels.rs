//! Class names. A weights file can carry its own (`labels` metadata); a 47-class model without
//! them is taken to be an iMaterialist Fashion 2019 model.

use std::sync::Arc;

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

/// What class 0 and any id beyond the table are called.
const BACKGROUND: &str = "background";

/// The model's one table of class names, shared by everything that writes or draws a result:
/// cloning it is a reference count, so an output thread can hold its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labels(Arc<[String]>);

impl Labels {
    /// `foreground[k]` names torchvision label `k + 1`.
    pub fn new(foreground: Vec<String>) -> Self {
        Self(foreground.into())
    }

    /// Names for foreground classes 1..num_classes-1 when the file carries none.
    pub fn default_for(num_classes: usize) -> Self {
        if num_classes == IMATERIALIST_2019.len() + 1 {
            Self::new(IMATERIALIST_2019.map(str::to_owned).to_vec())
        } else {
            Self::new((1..num_classes).map(|k| format!("class {k}")).collect())
        }
    }

    /// The name of torchvision label `class_id` (1-based; 0 is background).
    pub fn get(&self, class_id: usize) -> &str {
        class_id
            .checked_sub(1)
            .and_then(|i| self.0.get(i))
            .map_or(BACKGROUND, String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_one_based_and_unknown_ones_are_background() {
        let labels = Labels::new(vec!["shirt".into(), "skirt".into()]);
        assert_eq!(
            [0, 1, 2, 3].map(|k| labels.get(k)),
            ["background", "shirt", "skirt", "background"]
        );
        assert_eq!(Labels::default_for(47).get(9), "skirt");
        assert_eq!(Labels::default_for(3).get(2), "class 2");
    }
}
