// imrelay.js
